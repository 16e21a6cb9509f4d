"""Task lifecycle: archives in, state machine, durable state, results out."""
