"""Bridges to SAE trainers that are not Lightning: each module imports its trainer's package (an extra)."""
