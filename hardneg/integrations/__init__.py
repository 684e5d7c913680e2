"""Adapters that let other training libraries draw negatives from hardneg snapshots."""
