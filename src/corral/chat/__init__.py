"""`corral chat`: the terminal front end of the chat engine."""
