"""Code shared by cloud_server and edge_client: wire codec, LoRA math, model anatomy."""
