"""Pure rules of the product: identifiers, conversation kinds, permissions. No I/O."""
