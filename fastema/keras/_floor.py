"""The oldest Keras ``fastema.keras`` runs on, checked first at its import (:data:`KERAS_FLOOR`)."""
import keras

from .._floors import refuse_older

#: As ``pyproject.toml``'s ``keras`` extra says: the oldest release its tests passed on, on the
#: torch backend (``docs/install.md``, "Which framework release": on Keras 3.6 a model's running-mean
#: metrics are not where MovingAverageLogs reads them).
KERAS_FLOOR = (3, 7)

refuse_older("fastema.keras", "keras", keras.__version__, KERAS_FLOOR, "keras",
             "on Keras 3.6 MovingAverageLogs finds no running-mean metric of the model")
