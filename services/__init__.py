"""Services: the `nebula` CLI, the REST job API and job orchestration."""
