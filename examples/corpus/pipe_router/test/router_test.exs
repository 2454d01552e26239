defmodule PipeRouter.RouterTest do
  use ExUnit.Case, async: true

  alias PipeRouter.Request

  describe "GET" do
    test "root responds ok" do
      assert %Request{status: 200, resp_body: "ok"} = PipeRouter.request(:get, "/")
    end

    test "user by id" do
      req = PipeRouter.request("get", "/users/42")
      assert req.status == 200
      assert req.resp_body == ~s({"id":42,"name":"user-42"})
      assert req.assigns.user_id == 42
    end

    test "invalid id is a 400" do
      assert %Request{status: 400} = PipeRouter.request(:get, "/users/abc")
    end

    test "pagination is validated" do
      assert %Request{status: 200} = PipeRouter.request(:get, "/users?page=2&per_page=3")
      assert %Request{status: 400} = PipeRouter.request(:get, "/users?per_page=1000")
      assert %Request{status: 400} = PipeRouter.request(:get, "/users?page=zero")
    end

    test "trailing slash is ignored" do
      assert %Request{status: 200} = PipeRouter.request(:get, "/health/")
    end
  end

  describe "writes" do
    test "require a bearer token" do
      req = PipeRouter.request(:put, "/users/1", body: "{}")
      assert req.status == 401
      assert req.halted
      assert req.resp_headers["www-authenticate"] == "Bearer"
    end

    test "succeed with a token and a body" do
      headers = %{"Authorization" => "Bearer s3cret"}
      req = PipeRouter.request(:patch, "/users/1", headers: headers, body: ~s({"name":"x"}))
      assert req.status == 200
    end

    test "reject an empty body" do
      headers = %{"authorization" => "Bearer s3cret"}
      assert %Request{status: 422} = PipeRouter.request(:put, "/users/1", headers: headers)
    end
  end

  test "unknown routes and wrong methods" do
    assert %Request{status: 404} = PipeRouter.request(:get, "/nope")

    headers = %{"authorization" => "Bearer t"}
    assert %Request{status: 405} = PipeRouter.request(:post, "/health", headers: headers)
  end
end
