"""The stream stages: Faust agents between the catalogue topics, and their pure logic."""
