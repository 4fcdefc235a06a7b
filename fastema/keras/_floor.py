"""The oldest Keras ``fastema.keras`` runs on (``fastema._floors.FLOORS``), checked first at its import."""
import keras

from .._floors import refuse_older

refuse_older("fastema.keras", "keras", keras.__version__,
             "older releases are not tested (on Keras 3.6 MovingAverageLogs finds no running-mean "
             "metric of the model)")
