"""Helpers shared by the tests (fakes, subprocess drivers); never imported by the product."""
