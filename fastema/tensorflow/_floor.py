"""The oldest TensorFlow ``fastema.tensorflow`` runs on (``fastema._floors.FLOORS``), checked first at
its import: before 2.20 a TensorFlow tensor has no ``__dlpack__``, by which fastema reads it."""
import tensorflow as tf

from .._floors import refuse_older

refuse_older("fastema.tensorflow", "tensorflow", tf.__version__,
             "before 2.20 a TensorFlow tensor has no __dlpack__, by which fastema reads it",
             "where tensorflow-cpu is what is installed, pip install -U 'tensorflow-cpu>=2.20'")
