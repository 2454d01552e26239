defmodule TextToolsTest do
  use ExUnit.Case, async: true
  doctest TextTools
  doctest TextTools.WordCount
  doctest TextTools.Wrap

  alias TextTools.{WordCount, Wrap}

  test "unique_count counts distinct words" do
    assert WordCount.unique_count("a b a C c") == 3
  end

  test "wrap never produces lines longer than width unless a word is" do
    text = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod"

    for width <- 5..30 do
      text
      |> Wrap.wrap(width)
      |> String.split("\n")
      |> Enum.each(fn line ->
        assert String.length(line) <= width or not String.contains?(line, " ")
      end)
    end
  end

  test "center pads on both sides" do
    assert Wrap.center("ab", 6) == "  ab  "
    assert Wrap.center("abc", 6, "*") == "*abc**"
    assert Wrap.center("toolong", 3) == "toolong"
  end
end
