"""Recipes: one file takes a teacher and the user's data through the stages to the models it makes (docs/recipes.md)."""
