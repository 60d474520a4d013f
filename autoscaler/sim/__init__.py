"""The simulator: replays a recording through a policy and the guards, closed loop
(``simulate``), reports the outcome (``report``), and plays a recording as a live fleet over
MQTT (``fleetsim``)."""
