"""The oldest TensorFlow ``fastema.tensorflow`` runs on, checked first at its import (:data:`TF_FLOOR`)."""
import tensorflow as tf

from .._floors import refuse_older

#: As ``pyproject.toml``'s ``tensorflow`` extra says: the oldest release its tests passed on
#: (``docs/install.md``, "Which framework release"): before 2.20 a TensorFlow tensor has no
#: ``__dlpack__``, by which fastema reads it.
TF_FLOOR = (2, 20)

refuse_older("fastema.tensorflow", "tensorflow", tf.__version__, TF_FLOOR, "tensorflow",
             "before 2.20 a TensorFlow tensor has no __dlpack__, by which fastema reads it")
