"""Trainers: the shared loop (schedule, metrics, checkpoints, exact resume) and one short file per model."""
