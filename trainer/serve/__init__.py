"""The real-time policy server: openpi's websocket protocol over a quantized WAM, closed loop per session."""
