"""The composition root: the one place that assembles every component's commands."""
