"""Tests that need no process outside pytest: pure functions, the fleet, policies, guards."""
