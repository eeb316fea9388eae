"""The engine shared by the operator and local mode: plan, reconcile, status, snapshots."""
