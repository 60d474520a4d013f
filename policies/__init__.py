"""Built-in policies. Each is a :class:`autoscaler.policy.Policy` subclass in its own module."""
