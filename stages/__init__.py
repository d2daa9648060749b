"""Pipeline stages: plain computation over arrays and paths. No stage imports another."""
