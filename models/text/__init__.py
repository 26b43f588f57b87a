"""Report text: section parsing, entity and negation matching, the WordPiece tokenizer and MLM masking."""
