"""Array stand-ins the array-function tests share."""


class DLPackOnly:
    """An array known to fastema only through DLPack (as a JAX or CuPy array is): no cheap key, so the
    array functions and the pair cache take their described path."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, **kwargs):
        return self.t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()
