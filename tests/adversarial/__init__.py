"""Adversarial tests: the CI and CI-s tiers of SECURITY §5 (see docs/security.md)."""
