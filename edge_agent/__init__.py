"""The site's link to the cloud (its own process)."""
