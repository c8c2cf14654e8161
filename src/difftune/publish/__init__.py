"""What a finished run gives to others: its model card, and the upload to the Hugging Face Hub."""
