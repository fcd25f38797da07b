"""Flower's Deployment Engine: a local deployment on loopback, docker-compose files, TLS certificates."""
