"""Small helpers shared across Bastion (atomic files, seeding, devices)."""
