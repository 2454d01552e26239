defmodule TextTools.SlugTest do
  use ExUnit.Case, async: true
  doctest TextTools.Slug

  alias TextTools.Slug

  test "empty and punctuation-only input gives an empty slug" do
    assert Slug.slugify("") == ""
    assert Slug.slugify("!!! ???") == ""
  end

  test "lowercase can be turned off" do
    assert Slug.slugify("Hello World", lowercase: false) == "Hello-World"
  end

  test "a slug is stable under slugify" do
    for title <- ["Hello, World!", "Ünïcödé títle", "  spaced   out  "] do
      slug = Slug.slugify(title)
      assert Slug.slugify(slug) == slug
      assert Slug.valid?(slug)
    end
  end
end
