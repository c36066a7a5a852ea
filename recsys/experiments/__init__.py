"""Online experiments: definitions and sticky assignment, team-draft interleaving, exploration, and the
statistics that judge variants by what the people they served did."""
