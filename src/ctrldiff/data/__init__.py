"""Built-in data: 2-D toy distributions (with exact noised scores for GMMs) and sklearn digits."""
