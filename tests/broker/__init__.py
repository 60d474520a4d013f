"""Tests against real services the test setup starts: mosquitto, Prometheus, a terminal."""
