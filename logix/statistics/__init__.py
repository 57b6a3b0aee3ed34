"""Curvature statistics: covariances, eigendecompositions, corrected eigenvalues."""
