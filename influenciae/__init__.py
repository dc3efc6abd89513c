"""influenciae."""
