"""Sweeps: a sweep file -> runs -> packs -> a worker trains each pack -> the store.

`file` (reading and checking a sweep file), `plan` (runs -> packs), `estimates` (memory, time and
default pack size), `folder` (the sweep folder's layout), `worker` (one pack, in any process),
`store` (SQLite and the CSV tables), `progress` (the display), `driver` (the command's loop),
`ray_executor` (packs as Ray tasks).
"""
