"""Evaluation of t2i models: `hart-eval generate` (images for an evaluation prompt set under HART's
published protocol), `hart-eval fid` and `hart-eval clip` (metrics from local network weights only)."""
