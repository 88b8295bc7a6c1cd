"""The runtime: inference engines behind one KV-cache step interface (engines.py), the greedy generation loop
over them (decode.py). `export` validates with it and `bench` times it; neither owns it."""
