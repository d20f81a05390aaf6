"""Physics simulation: scripted demonstrations recorded as LeRobot datasets (`wam sim record`)."""
