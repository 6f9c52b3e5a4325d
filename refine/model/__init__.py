"""The model: refinable scalars (:mod:`.table`), crystal systems (:mod:`.cells`), increments ↔ ``Params``
(:mod:`.parameters`), simulate + background (:mod:`.predict`) and free pairs the image cannot tell apart
(:mod:`.degeneracy`)."""
