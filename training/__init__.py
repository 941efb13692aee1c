"""Trainer plumbing: recipe config, optimizer, LR schedule, metrics."""
