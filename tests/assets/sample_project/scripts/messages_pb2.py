def generated_by_protoc():
    """Generated protocol buffer code."""
    return None
