"""midpo stage 1: raw preference files -> canonical pairs -> tokenized, sharded Arrow + manifest."""
