"""The CUDA wing of dispatch: the launches (:mod:`.launch`), the tables (:mod:`.tables`), the
driver (:mod:`.driver`, :mod:`.drivers`), device memory and its frees, the device code and its
compiler, the argument ABI. Nothing here is imported with fastema: ``fastema._launch.launches``
imports this wing at the first CUDA buffer, after the fork check (:mod:`.forked`). This module
imports nothing."""
