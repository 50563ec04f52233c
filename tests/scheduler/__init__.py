"""Tests of torpor.scheduler: config, inventory, metrics, the policy core and the daemon."""
