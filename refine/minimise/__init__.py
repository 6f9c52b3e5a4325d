"""Minimisers: Levenberg–Marquardt (:mod:`.lm`), the linear solves of its normal equations (:mod:`.schur`), L-BFGS
and Adam (:mod:`.optim`)."""
