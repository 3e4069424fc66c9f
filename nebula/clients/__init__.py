"""Clients of Nebula's services, shared by the roles that call them."""
