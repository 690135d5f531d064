"""Shard schema, the shard writer/verifier CLI (`hart-data`), and the streaming reader."""
