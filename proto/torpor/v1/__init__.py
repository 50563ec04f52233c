"""Generated protocol stubs of the `torpor.v1` package (`make proto`; do not edit by hand)."""
