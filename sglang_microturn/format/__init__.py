"""The micro-turn format: the interleaved token layout and the streaming dMel audio front-end (numpy only)."""
