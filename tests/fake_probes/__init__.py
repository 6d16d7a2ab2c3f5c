"""Tiny probe modules the doctor tests inject through the registry parameter."""
