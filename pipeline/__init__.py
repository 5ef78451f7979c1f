"""Data in and tokens out: sources, shards, Ray Data streams, token store, tracking, configs."""
