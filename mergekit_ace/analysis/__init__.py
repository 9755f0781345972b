"""Diagnostics over real checkpoints: ``inspect`` (per-weight ACE/ACTMat numbers) and ``covariance``
(how well the data-free proxies match the real input covariances)."""
