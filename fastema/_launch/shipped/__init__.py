"""The shipped device code's build: the variants the launches ask for (:mod:`.variants`) and one
set of the store built (:mod:`.store`, ``python -m fastema warm --into``)."""
